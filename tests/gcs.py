"""Real stand-ins for Google Cloud in the tests: `gcp-storage-emulator` over HTTP, service-account
keys generated on the spot, a small IAM Credentials + OAuth token server, and a V4 signed-URL
verifier written from Google's spec (independent of the client library that signs)."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import google.oauth2.credentials
import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

BUCKET = "artserve-test"
SERVICE_ACCOUNT = "artserve-signer@artserve-test.iam.gserviceaccount.com"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """`python -m gcp_storage_emulator start` on 127.0.0.1, data on disk so a restart keeps
    the bucket and its objects (like a real outage would)."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir, self.port = data_dir, port or free_port()
        self.host = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> Emulator:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gcp_storage_emulator", "-d", str(self.data_dir), "start", "--host", "127.0.0.1",
             "--port", str(self.port), "--default-bucket", BUCKET, "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.host}/", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("gcp-storage-emulator did not start")

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def service_account_key(path: Path, email: str = SERVICE_ACCOUNT) -> rsa.RSAPublicKey:
    """Write a service-account key file (as the Cloud console hands out); return its public key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "artserve-test", "private_key_id": "test-key-1",
        "private_key": pem, "client_email": email, "client_id": "1",
        "token_uri": "http://127.0.0.1:9/token",  # never called: uploads go to the emulator anonymously
    }))
    return key.public_key()


def verify_v4_url(url: str, public_key: rsa.RSAPublicKey) -> dict[str, str]:
    """Check a V4 signed GET URL the way GCS does; return its query. Raises InvalidSignature."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    signature = bytes.fromhex(query.pop("X-Goog-Signature"))
    canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items()))
    signed_headers = query["X-Goog-SignedHeaders"]
    assert signed_headers == "host"
    canonical_request = "\n".join(
        ["GET", parts.path, canonical_query, f"host:{parts.netloc}\n", signed_headers, "UNSIGNED-PAYLOAD"]
    )
    scope = query["X-Goog-Credential"].split("/", 1)[1]
    string_to_sign = "\n".join([
        "GOOG4-RSA-SHA256", query["X-Goog-Date"], scope, hashlib.sha256(canonical_request.encode()).hexdigest()
    ])
    public_key.verify(signature, string_to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())
    return query


class FakeGoogle:
    """The OAuth token endpoint, the GCE/GKE metadata server (what Workload Identity looks
    like from a pod) and the IAM Credentials `signBlob` method, over real HTTP. Records every
    request; signs with its own key; can fail the next N signBlob calls."""

    def __init__(self, token_lifetime_s: int = 3600):
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_key = self._key.public_key()
        self.token_lifetime_s = token_lifetime_s
        self.tokens_issued = 0
        self.sign_requests: list[dict] = []
        self.fail_next = 0
        self.delay_s = 0.0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def credentials(self) -> google.oauth2.credentials.Credentials:
        """Credentials with no private key (like Workload Identity's), tokens from this server."""
        return google.oauth2.credentials.Credentials(
            None, refresh_token="r", client_id="c", client_secret="s", token_uri=f"{self.url}/token"
        )

    def close(self) -> None:
        self._server.shutdown()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # the metadata server
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._reply(403, {"error": "missing Metadata-Flavor"})
                path = self.path.split("?")[0]
                if path in ("/", "/computeMetadata/v1/"):
                    return self._reply(200, {})
                if path.endswith("/service-accounts/default/"):
                    return self._reply(200, {"email": SERVICE_ACCOUNT, "aliases": ["default"],
                                             "scopes": ["https://www.googleapis.com/auth/cloud-platform"]})
                if path.endswith("/service-accounts/default/token"):
                    fake.tokens_issued += 1
                    return self._reply(200, {"access_token": f"token-{fake.tokens_issued}",
                                             "expires_in": fake.token_lifetime_s, "token_type": "Bearer"})
                if path.endswith("/project/project-id"):
                    return self._text("artserve-test")
                if path.endswith("/universe/universe-domain"):
                    return self._text("googleapis.com")
                return self._reply(404, {"error": path})

            def _text(self, text: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Metadata-Flavor", "Google")
                self.end_headers()
                self.wfile.write(text.encode())

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/token":
                    fake.tokens_issued += 1
                    return self._reply(200, {"access_token": f"token-{fake.tokens_issued}",
                                             "expires_in": fake.token_lifetime_s, "token_type": "Bearer"})
                time.sleep(fake.delay_s)
                fake.sign_requests.append({"path": self.path, "authorization": self.headers.get("Authorization"),
                                           "body": json.loads(body)})
                if fake.fail_next:
                    fake.fail_next -= 1
                    return self._reply(503, {"error": {"code": 503, "message": "try again"}})
                payload = base64.b64decode(json.loads(body)["payload"])
                signed = fake._key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
                self._reply(200, {"keyId": "iam-key-1", "signedBlob": base64.b64encode(signed).decode()})

        return Handler
