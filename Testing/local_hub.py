"""A model hub on 127.0.0.1 that speaks the part of the Hugging Face hub's protocol huggingface_hub uses to
download a model, so tests run the real client (`HF_ENDPOINT=hub.url`):

  GET  /api/models/{repo}/revision/{rev}[?blobs=true]  model info: commit `sha`, `siblings` with size, blobId,
                                                        lfs {sha256, size, pointerSize}
  HEAD /{repo}/resolve/{rev}/{file}                    X-Repo-Commit, ETag, and for LFS files X-Linked-Etag /
                                                        X-Linked-Size (huggingface_hub's get_hf_file_metadata)
  GET  /{repo}/resolve/{rev}/{file}                    the bytes; `Range: bytes=N-` answers 206 from N

Faults a test switches on: `cut_once` (file names whose first GET stops halfway and drops the connection),
`stall_once` (file names whose first GET stops halfway and waits for `release` before dropping it: a download
to cancel mid-file), `corrupt` (file names served with one byte changed, same size). Every request is logged in `requests`.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors",)


@dataclass
class HubRepoFile:
    name: str
    data: bytes

    @property
    def lfs(self) -> bool:
        return self.name.endswith(LFS_SUFFIXES)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class LocalHub:
    repo_id: str
    files: dict[str, HubRepoFile]
    cut_once: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    stall_once: set[str] = field(default_factory=set)
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range header)
    server: ThreadingHTTPServer | None = None

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path) -> "LocalHub":
        files = {path.relative_to(folder).as_posix(): HubRepoFile(path.relative_to(folder).as_posix(), path.read_bytes())
                 for path in sorted(folder.rglob("*")) if path.is_file()}
        return cls(repo_id, files)

    tls: bool = False

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    @property
    def bytes_total(self) -> int:
        return sum(len(file.data) for file in self.files.values())

    def start(self, certificate: tuple[Path, Path] | None = None) -> "LocalHub":
        """Serve on a free port of 127.0.0.1; over TLS with (certificate, key) when given."""
        hub = self

        class Handler(_HubHandler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if certificate is not None:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*certificate)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.tls = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def model_info(self) -> dict:
        siblings = []
        for file in self.files.values():
            entry = {"rfilename": file.name, "size": len(file.data), "blobId": file.blob_id}
            if file.lfs:
                entry["lfs"] = {"sha256": file.sha256, "size": len(file.data), "pointerSize": 134}
            siblings.append(entry)
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": COMMIT, "private": False, "siblings": siblings}


class _HubHandler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _route(self):
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append((self.command, path, self.headers.get("Range")))
        repo = re.escape(self.hub.repo_id)
        if match := re.fullmatch(rf"/api/models/{repo}(?:/revision/[^/]+)?", path):
            return "info", None
        if match := re.fullmatch(rf"/{repo}/resolve/[^/]+/(.+)", path):
            return "file", match.group(1)
        return None, None

    def do_GET(self) -> None:
        kind, name = self._route()
        if kind == "info":
            return self._json(200, self.hub.model_info())
        if kind != "file" or name not in self.hub.files:
            return self._json(404, {"error": "Repository Not Found"} if kind is None else {"error": "Entry not found"})
        file = self.hub.files[name]
        data = file.data
        if name in self.hub.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or ""):
            start = int(match.group(1))
        self.send_response(206 if start else 200)
        self._file_headers(file)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        body = data[start:]
        if name in self.hub.cut_once or name in self.hub.stall_once:
            stall = name in self.hub.stall_once
            self.hub.cut_once.discard(name)
            self.hub.stall_once.discard(name)
            try:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
            except OSError:  # the client went away first (a cancelled download)
                return
            if stall:
                self.hub.release.wait(60)
            self.close_connection = True
            self.connection.shutdown(2)  # the connection drops mid-file
            return
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        kind, name = self._route()
        if kind != "file" or name not in self.hub.files:
            return self._json(404, {"error": "Entry not found"})
        file = self.hub.files[name]
        self.send_response(200)
        self._file_headers(file)
        self.send_header("Content-Length", str(len(file.data)))
        self.end_headers()

    def _file_headers(self, file: HubRepoFile) -> None:
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if file.lfs:
            self.send_header("ETag", f'"{file.blob_id}"')  # the pointer's blob; the content's id follows
            self.send_header("X-Linked-Etag", f'"{file.sha256}"')
            self.send_header("X-Linked-Size", str(len(file.data)))
        else:
            self.send_header("ETag", f'"{file.blob_id}"')


def make_certificate(folder: Path) -> tuple[Path, Path] | None:
    """A self-signed certificate for 127.0.0.1 (an organisation's CA whose proxy inspects TLS): (cert, key), or
    None where openssl cannot make one."""
    import subprocess

    cert, key = folder / "org-ca.pem", folder / "key.pem"
    try:
        made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                               str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                               "subjectAltName=IP:127.0.0.1"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (cert, key) if made.returncode == 0 else None
