"""Images stored in a GCS bucket (the emulator, over HTTP) through the real Serve app and the
OpenAI SDK: V4 signed links that fetch with a plain GET, and a bucket outage as a clean 503."""

from __future__ import annotations

import io

import httpx
import openai
import pytest
from PIL import Image

from tests.gcs import BUCKET, SERVICE_ACCOUNT, verify_v4_url

pytestmark = pytest.mark.integration
REQUEST = {"model": "tiny-flux-gcs", "prompt": "a lighthouse at dusk", "size": "256x256"}
STEPS = {"num_inference_steps": 2}


@pytest.fixture(scope="module")
def gcs_client(server) -> openai.OpenAI:
    return server.client(prefix="/gcs")


def test_url_is_a_v4_signed_link_to_the_bucket(server, gcs_client):
    response = gcs_client.images.generate(**REQUEST, n=2, extra_body={**STEPS, "output_format": "png"})
    assert len(response.data) == 2
    for image in response.data:
        assert image.url.startswith(f"{server.emulator.host}/{BUCKET}/images/")
        query = verify_v4_url(image.url, server.gcs_public_key)  # signed by the key generated for this run
        assert query["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256"
        assert query["X-Goog-Expires"] == "86400"
        assert query["X-Goog-Credential"].startswith(f"{SERVICE_ACCOUNT}/")
        fetched = httpx.get(image.url)  # no credentials: the signature is the permission
        assert fetched.status_code == 200
        assert Image.open(io.BytesIO(fetched.content)).size == (256, 256)
    assert response.data[0].url != response.data[1].url


def test_bucket_outage_is_a_503_then_recovers_without_a_restart(server, gcs_client):
    server.emulator.stop()
    try:
        with pytest.raises(openai.InternalServerError) as raised:
            gcs_client.images.generate(**REQUEST, n=2, extra_body=STEPS)
        assert raised.value.status_code == 503
        error = raised.value.body
        assert error["type"] == "service_unavailable_error"
        assert "storage" in error["message"]
        assert "data" not in raised.value.response.json()  # nothing partial
        # b64_json needs no bucket: the model itself is fine.
        assert gcs_client.images.generate(**REQUEST, response_format="b64_json", extra_body=STEPS).data[0].b64_json
    finally:
        server.emulator.start()
    image = gcs_client.images.generate(**REQUEST, extra_body=STEPS).data[0]
    assert httpx.get(image.url).status_code == 200


def test_a_gcs_app_serves_no_local_files(server):
    """With a bucket, the ingress's local file route answers 404 in the envelope, not a 500."""
    response = httpx.get(f"{server.base_url}/gcs/v1/files/images/2026/11/23/{'0' * 32}.png?expires=1&signature=x")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"
