"""A local stand-in for the Hub's write API, enough for huggingface_hub's real ``create_repo`` + ``upload_folder``
code path (repo creation, README metadata validation, pre-upload, NDJSON commit) and for reading the committed
files back. Of the Hub's metadata checks only one is modelled: ``base_model`` must hold Hub ids, the rule a local
path breaks (huggingface/transformers#33922).

    python local_hub.py PORT_FILE STORE_DIR     # serves on a free port, writes the port to PORT_FILE

Committed files land in STORE_DIR/<repo_type>s/<owner>/<name>/<path> and are served back on the Hub's
``resolve`` URLs (so ``hf_hub_download`` fills a real cache); every request is appended to STORE_DIR/requests.log
as "METHOD PATH AUTHORIZATION-PRESENT".
"""

import base64
import hashlib
import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml


PORT_FILE, STORE = Path(sys.argv[1]), Path(sys.argv[2])
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
RESOLVE_PATH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_PATH = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/(preupload|commit|branch)/([^/?]+)")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open(STORE / "requests.log", "a") as log:
            log.write(f"POST {self.path} {'Authorization' in self.headers}\n")
        if self.path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request.get('organization') or 'user'}/{request['name']}"
            return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
        if self.path == "/api/validate-yaml":  # the one metadata rule at stake here: base_model must be Hub ids
            content = json.loads(body)["content"]
            front = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
            bases = front.get("base_model") or []
            bad = [base for base in ([bases] if isinstance(bases, str) else bases) if not REPO_ID.match(base)]
            errors = [{"message": f'"base_model" must be a Hub model id, got "{base}"'} for base in bad]
            return self._reply(400 if errors else 200, {"errors": errors, "warnings": []})
        match = REPO_PATH.match(self.path)
        if match and match[3] == "branch":
            return self._reply(200, {})
        if match and match[3] == "preupload":
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self._reply(200, {"files": modes})
        if match and match[3] == "commit":
            root = STORE / match[1] / match[2]
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    target = root / item["value"]["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(item["value"]["content"]))
            url = f"http://{self.headers['Host']}/{match[2]}/commit/{COMMIT}"
            return self._reply(200, {"commitUrl": url, "commitOid": COMMIT, "pullRequestUrl": None})
        self._reply(404, {"error": f"not served here: {self.path}"})

    def _serve_file(self, send_body: bool) -> None:
        """``/<repo>/resolve/<revision>/<path>`` (model repos) and ``/<datasets|spaces>/<repo>/resolve/...``."""
        with open(STORE / "requests.log", "a") as log:
            log.write(f"{self.command} {self.path} {'Authorization' in self.headers}\n")
        match = RESOLVE_PATH.match(self.path.split("?")[0])
        target = STORE / (match[1] or "models") / match[2] / match[4] if match else None
        if target is None or not target.is_file():
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if match else "RepoNotFound")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        content = target.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("ETag", f'"{hashlib.sha1(content).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if send_body:
            self.wfile.write(content)

    def do_HEAD(self):  # noqa: N802
        self._serve_file(send_body=False)

    def do_GET(self):  # noqa: N802
        self._serve_file(send_body=True)


if __name__ == "__main__":
    STORE.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    PORT_FILE.write_text(str(server.server_address[1]))
    server.serve_forever()
