"""A registry token service for tests: the flow Docker Hub, Harbor, ACR and GHCR use.

The registry (`auth: token`) answers 401 with `WWW-Authenticate: Bearer realm=…`;
the client fetches `realm?service=…&scope=repository:NAME:pull` with Basic
credentials and gets a JWT, signed with a key whose certificate is the
registry's `rootcertbundle`, granting the requested actions.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sandbox.pki import CertificateAuthority

ISSUER = "scangate-test-token-service"


class TokenServer:
    def __init__(self, directory: Path, users: dict[str, str], service: str,
                 realm_host: str = "localhost") -> None:
        # Trivy (go-containerregistry) refuses a token realm on a literal private IP.
        ca = CertificateAuthority(directory / "token-pki", name="token-signing-ca")
        self.signing = ca.issue("token-signer", "token-signer")
        self.root_bundle = ca.cert_path
        self.users, self.service = users, service
        self.issued: list[dict[str, Any]] = []
        der = x509.load_pem_x509_certificate(self.signing.cert.read_bytes()).public_bytes(
            serialization.Encoding.DER)
        chain = [base64.b64encode(der).decode(), base64.b64encode(
            x509.load_pem_x509_certificate(ca.cert_path.read_bytes()).public_bytes(
                serialization.Encoding.DER)).decode()]
        key = self.signing.key.read_bytes()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                user = server.check(self.headers.get("Authorization", ""))
                if user is None:
                    self.send_response(401)
                    self.end_headers()
                    return
                access = [{"type": kind, "name": name, "actions": actions.split(",")}
                          for scope in query.get("scope", [])
                          for kind, name, actions in [scope.split(":", 2)]]
                now = int(time.time())
                claims = {"iss": ISSUER, "sub": user, "aud": query.get("service", [""])[0],
                          "iat": now, "nbf": now - 10, "exp": now + 300,
                          "jti": uuid.uuid4().hex, "access": access}
                server.issued.append(claims)
                token = jwt.encode(claims, key, algorithm="ES256", headers={"x5c": chain})
                body = json.dumps({"token": token, "access_token": token,
                                   "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://{realm_host}:{self.http.server_address[1]}/token"

    def check(self, header: str) -> str | None:
        """The user of valid Basic credentials, else None."""
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else None

    def registry_auth(self) -> dict[str, Any]:
        """The `auth:` section of the registry's configuration."""
        return {"token": {"realm": self.realm, "service": self.service, "issuer": ISSUER,
                          "rootcertbundle": str(self.root_bundle)}}

    def start(self) -> None:
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.http.shutdown()
