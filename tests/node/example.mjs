// The reference docs' Node.js example, unchanged but for baseURL (from the environment)
// and the model id. Prints the response as JSON for the Python test to check.
import OpenAI from 'openai'

const client = new OpenAI({
  apiKey: process.env.ARTAPI_KEY,
  baseURL: process.env.ARTSERVE_BASE_URL,
})

const response = await client.images.generate({
  model: process.env.ARTSERVE_MODEL,
  prompt: 'A minimalist logo for a tech startup, flat design, blue tones',
  n: 1,
  size: '1024x1024',
  quality: 'hd',
  num_inference_steps: 2, // keeps the CPU test short; not part of the reference example
})

console.log(JSON.stringify(response))
