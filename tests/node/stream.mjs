// Streams a generation with the official Node SDK (images.generate with stream: true) and
// prints each event as one JSON line for tests/integration/test_streaming.py to check.
import OpenAI from 'openai'

const client = new OpenAI({ apiKey: process.env.ARTAPI_KEY, baseURL: process.env.ARTSERVE_BASE_URL })
const stream = await client.images.generate({
  model: process.env.ARTSERVE_MODEL,
  prompt: 'a lighthouse at dusk',
  stream: true,
  partial_images: 2,
  output_format: 'png',
  num_inference_steps: 6, // keeps the CPU test short
})
for await (const event of stream) {
  console.log(JSON.stringify(event))
}
