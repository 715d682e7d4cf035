// Multi-reference edits with the official Node SDK (images.edit, multipart: a list of files is
// sent as repeated `image[]`): two files on a reference model, then one file more than its card
// allows (the 400). Prints one JSON line each for tests/integration/test_flux2.py to check.
import { readFileSync } from 'node:fs'
import OpenAI, { toFile } from 'openai'

const client = new OpenAI({ apiKey: process.env.ARTAPI_KEY, baseURL: process.env.ARTSERVE_BASE_URL, maxRetries: 0 })
const images = JSON.parse(process.env.ARTSERVE_IMAGE_PATHS).map((path) => readFileSync(path))
const files = async (count) => Promise.all(
  Array.from({ length: count }, (_, i) => toFile(images[i % images.length], `ref${i}.png`, { type: 'image/png' })))
const model = process.env.ARTSERVE_MODEL

const two = await client.images.edit({
  model,
  image: await files(2),
  prompt: 'the two of them together',
  response_format: 'b64_json',
  num_inference_steps: 2, // keeps the CPU test short
  seed: 5,
})
console.log(JSON.stringify(two))

try {
  await client.images.edit({ model, image: await files(Number(process.env.ARTSERVE_MAX_IMAGES) + 1), prompt: 'too many' })
  console.log(JSON.stringify({ status: 200 }))
} catch (error) {
  console.log(JSON.stringify({ status: error.status, param: error.param ?? error.error?.param ?? null }))
}
