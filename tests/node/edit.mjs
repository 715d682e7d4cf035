// Edits with the official Node SDK (images.edit, multipart): one file, then two files on a
// model that takes one image (its 400). Prints one JSON line each for
// tests/integration/test_edits.py to check.
import OpenAI, { toFile } from 'openai'

const client = new OpenAI({ apiKey: process.env.ARTAPI_KEY, baseURL: process.env.ARTSERVE_BASE_URL, maxRetries: 0 })
const bytes = Buffer.from(process.env.ARTSERVE_IMAGE_B64, 'base64')
const image = async (name) => toFile(bytes, name, { type: 'image/png' })

const one = await client.images.edit({
  model: process.env.ARTSERVE_MODEL,
  image: await image('in.png'),
  prompt: 'a lighthouse at dusk',
  response_format: 'b64_json',
  num_inference_steps: 2, // keeps the CPU test short
})
console.log(JSON.stringify(one))

try {
  await client.images.edit({
    model: process.env.ARTSERVE_MODEL,
    image: [await image('a.png'), await image('b.png')],
    prompt: 'two inputs',
  })
  console.log(JSON.stringify({ status: 200 }))
} catch (error) {
  console.log(JSON.stringify({ status: error.status, param: error.param ?? error.error?.param ?? null }))
}
