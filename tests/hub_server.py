"""A loopback stand-in for the Hugging Face Hub, so that push/pull tests run the real `huggingface_hub` client offline.

`LoopbackHub` is a stdlib `http.server` running in a daemon thread, bound to 127.0.0.1 on an ephemeral port, that
keeps repositories (full commit history, content-addressed blobs) in a directory of your choosing. It speaks the part
of the Hub HTTP API that `huggingface_hub` 2.4, `transformers` and `peft` use to publish and load a model:

    GET  /api/agent-harnesses                                    (asked once at client start-up)
    GET  /api/whoami-v2
    POST /api/validate-yaml                                      (README front matter, checked before a commit)
    POST /api/repos/create
    GET  /api/{type}s/{ns}/{name}[/revision/{rev}]               (repo info: sha, siblings, cardData, ...)
    GET  /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]
    POST /api/{type}s/{ns}/{name}/preupload/{rev}                (regular vs LFS upload mode)
    POST /api/{type}s/{ns}/{name}/commit/{rev}                   (NDJSON: header, file (base64), lfsFile, deleted*)
    POST /api/{type}s/{ns}/{name}/branch/{branch}
    POST /[{type}s/]{ns}/{name}.git/info/lfs/objects/batch       (LFS batch API, "basic" transfer)
    PUT  /__lfs__/upload/{sha256}   POST /__lfs__/verify/{sha256}
    HEAD/GET /[{type}s/]{ns}/{name}/resolve/{rev}/{path}          (X-Repo-Commit, ETag, X-Linked-*, Content-Length)

Anything else is answered with a clean 404 (a JSON `{"error": ...}` body and `X-Error-Message`, no `X-Error-Code`, so
`huggingface_hub` raises a plain `HfHubHTTPError` its callers treat as "not found") and recorded in `hub.unhandled`.
Clients ask the endpoint things this server does not model: with `kernels` 0.19 installed, bitsandbytes' CPU ops ask
for `/api/organizations/kernels-community/overview` on whatever endpoint is set. Tests therefore assert on the
requests they care about (`hub.requests`, e.g. the commit), not on the complete list.

Why a subprocess is needed on the client side: `huggingface_hub` reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` once, when
`huggingface_hub.constants` is imported (`ENDPOINT`, and the URL template `hf_hub_download` builds its URLs from, are
module constants). Patching them afterwards leaves some code paths pointing at huggingface.co, and the test session
itself runs with `HF_HUB_OFFLINE=1`. So the server runs in the test process and the client runs in a fresh Python
process started with `LoopbackHub.client_env()`, which sets the endpoint, a token, online mode and an isolated
`HF_HOME` before anything is imported.

LFS: when `lfs=True`, the server answers "lfs" in preupload for weight/image files and for files of 10 MB or more,
like the Hub does. Installed `hf_xet` makes the client upload LFS files through the Xet protocol, which this server
does not speak, so `client_env(lfs=True)` also sets `HF_HUB_DISABLE_XET=1`; the client then uses the LFS batch
API implemented here. With `lfs=False` every file is committed inline (base64 in the NDJSON commit).

Nothing here is a security boundary, but it only listens on loopback and refuses any other peer.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_USER = "palora-tester"
DEFAULT_TOKEN = "hf_loopback_test_token"
REPO_TYPES = ("model", "dataset", "space")
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".png", ".jpg", ".jpeg", ".gif")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
LFS_POINTER_SIZE = 134
INITIAL_GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
MAX_BODY_BYTES = 512 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    """The object id git gives `data` as a blob: what the Hub returns as `oid`/ETag for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class FileEntry:
    """One file of one commit: content lives in the blob store under `sha256`."""

    sha256: str
    size: int
    git_oid: str
    lfs: bool


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit id -> the commit, or None."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)


class HubError(Exception):
    """An HTTP error answer with the `X-Error-Code` header `huggingface_hub` maps to its exception types."""

    def __init__(
        self, status: int, message: str, error_code: str | None = None, headers: dict | None = None, **extra: Any
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}
        self.extra = extra  # more fields of the JSON error body


class LoopbackHub:
    """An in-process Hub for tests. Use as a context manager; the server stops when the block exits.

    Args:
        root: directory for blobs (created if missing). Repositories live in memory for the server's lifetime.
        user: the user name that `token` authenticates as; repositories are created in this namespace.
        token: the only accepted access token.
        lfs: answer "lfs" in preupload for weight/image files and large files (see module docstring).
    """

    def __init__(self, root: str | os.PathLike, *, user: str = DEFAULT_USER, token: str = DEFAULT_TOKEN, lfs=False):
        if not isinstance(user, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", user):
            raise ValueError(f"`user` must be a Hub-style user name, got {user!r}")
        if not isinstance(token, str) or not token:
            raise ValueError("`token` must be a non-empty string")
        self.root = Path(root)
        self.user = user
        self.token = token
        self.lfs = bool(lfs)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the loopback hub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LoopbackHub:
        if self._server is not None:
            raise RuntimeError("the loopback hub is already running")
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def client_env(self, *, hf_home: str | os.PathLike, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a client subprocess: set before `huggingface_hub` is imported there (see module doc)."""
        env = dict(os.environ if base is None else base)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN_PATH",
                     "HUGGINGFACE_HUB_CACHE", "HF_HUB_ENABLE_HF_TRANSFER", "HF_STAGING", "HF_HUB_DISABLE_TELEMETRY",
                     "DISABLE_TELEMETRY", "DO_NOT_TRACK", "HF_HUB_DISABLE_XET"):
            env.pop(name, None)
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_TOKEN=self.token,
            HF_HUB_OFFLINE="0",
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_UPDATE_CHECK="1",
            HF_HUB_DISABLE_IMPLICIT_TOKEN="0",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        if self.lfs:
            env["HF_HUB_DISABLE_XET"] = "1"
        return env

    # ------------------------------------------------------------------------------------------ test helpers
    def read_file(self, repo_id: str, path: str, *, revision: str = "main", repo_type: str = "model") -> bytes:
        """Server-side view of a file, to check what the client published independently of the client."""
        with self._lock:
            commit = self._get_repo(repo_type, repo_id).resolve(revision)
            if commit is None or path not in commit.files:
                raise KeyError(f"{path!r} not in {repo_id}@{revision}")
            return self._read_blob(commit.files[path].sha256)

    def list_files(self, repo_id: str, *, revision: str = "main", repo_type: str = "model") -> dict[str, FileEntry]:
        with self._lock:
            commit = self._get_repo(repo_type, repo_id).resolve(revision)
            if commit is None:
                raise KeyError(f"no revision {revision!r} in {repo_id}")
            return dict(commit.files)

    def commit_log(self, repo_id: str, *, branch: str = "main", repo_type: str = "model") -> list[Commit]:
        """Commits reachable from `branch`, newest first."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            log, oid = [], repo.branches.get(branch)
            while oid is not None:
                log.append(repo.commits[oid])
                oid = repo.commits[oid].parent
            return log

    # ------------------------------------------------------------------------------------------ storage
    def _get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _blob_path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise HubError(400, f"invalid sha256 {sha256!r}")
        return self.root / "objects" / sha256

    def _store_blob(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._blob_path(sha256)
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        return sha256

    def _read_blob(self, sha256: str) -> bytes:
        return self._blob_path(sha256).read_bytes()

    def _new_commit(
        self, repo: Repo, branch: str, files: dict[str, FileEntry], title: str, description: str
    ) -> Commit:
        parent = repo.branches.get(branch)
        date = _now_iso()
        digest = hashlib.sha1()
        for part in (repo.repo_type, repo.repo_id, parent or "", title, description, date, str(len(repo.commits))):
            digest.update(part.encode() + b"\0")
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].sha256}\0".encode())
        commit = Commit(digest.hexdigest(), parent, title, description, date, dict(files))
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def _upload_mode(self, path: str, size: int) -> str:
        if self.lfs and size > 0 and (path.lower().endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD):
            return "lfs"
        return "regular"

    def _check_read(self, repo: Repo, user: str | None) -> None:
        if repo.private and user is None:
            raise HubError(401, f"Repository {repo.repo_id} not found", "RepoNotFound")

    def _check_write(self, repo_id: str, user: str | None) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to write", None, {"X-Error-Message": "Unauthorized"})
        if repo_id.split("/")[0] != user:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"


def _split_repo_type(segment: str) -> str | None:
    """'models' -> 'model' (the plural form the API paths use), None if not a repo type."""
    if segment.endswith("s") and segment[:-1] in REPO_TYPES:
        return segment[:-1]
    return None


def _safe_repo_path(path: str) -> str:
    """Reject absolute paths and '..' so a commit can never name something outside its repository."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return str(pure)


def _front_matter(text: str) -> dict[str, Any] | None:
    """The YAML block at the top of a README, parsed; None when there is none. Raises HubError if it is invalid."""
    match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, flags=re.DOTALL)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        raise HubError(400, f"Invalid YAML in README.md metadata: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HubError(400, "README.md metadata must be a YAML mapping")
    return data


class _HubHandler(BaseHTTPRequestHandler):
    hub: LoopbackHub  # set on the per-server subclass
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1.0"
    timeout = 60  # a stuck client connection must not keep the server thread alive forever

    # ------------------------------------------------------------------------------------------ plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by the base class
        pass  # requests are recorded in `hub.requests`; keep pytest output clean

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        raw_path = urlsplit(self.path).path
        with hub._lock:
            hub.requests.append((method, raw_path))
        try:
            if self.client_address[0] not in ("127.0.0.1", "::1"):
                raise HubError(403, "loopback clients only")
            body = self._read_body() if method in ("POST", "PUT") else b""
            handled = self._route(method, raw_path, body)
            if not handled:
                with hub._lock:
                    hub.unhandled.append((method, raw_path))
                raise HubError(404, f"Not found: the loopback hub does not model {method} {raw_path}")
        except HubError as error:
            headers = dict(error.headers)
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
            headers.setdefault("X-Error-Message", error.message)
            body = {"error": error.message, **error.extra}
            self._send_json(body, status=error.status, headers=headers, head=method == "HEAD")
        except Exception as error:  # noqa: BLE001 - a server bug must surface as a 500, not a hung client
            print(f"loopback hub: {method} {raw_path} failed: {error!r}", file=sys.stderr)
            self._send_json({"error": f"internal error: {error!r}"}, status=500, head=method == "HEAD")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    raise HubError(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise HubError(413, "request body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str], *, head: bool = False) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_json(self, payload: Any, *, status: int = 200, headers: dict | None = None, head: bool = False) -> None:
        body = json.dumps(payload).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})}, head=head)

    def _user(self) -> str | None:
        """The authenticated user, None when anonymous. A wrong token is an error, as on the Hub."""
        value = self.headers.get("Authorization")
        if not value:
            return None
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or token != self.hub.token:
            raise HubError(401, "Invalid credentials in Authorization header", None,
                           {"X-Error-Message": "Invalid credentials in Authorization header"})
        return self.hub.user

    # ------------------------------------------------------------------------------------------ routing
    def _route(self, method: str, raw_path: str, body: bytes) -> bool:
        raw_segments = [s for s in raw_path.split("/") if s != ""]
        segments = [unquote(s) for s in raw_segments]
        query = parse_qs(urlsplit(self.path).query)
        if segments[:1] == ["api"]:
            return self._route_api(method, segments[1:], query, body)
        if segments[:1] == ["__lfs__"] and len(segments) == 3:
            return self._route_lfs_transfer(method, segments[1], segments[2], body)
        repo_type = "model"
        if segments and _split_repo_type(segments[0]) in ("dataset", "space"):
            repo_type, segments = _split_repo_type(segments[0]), segments[1:]
        if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            self._resolve(method, repo_type, f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:]))
            return True
        if segments[2:] == ["info", "lfs", "objects", "batch"] and segments[1].endswith(".git") and method == "POST":
            self._lfs_batch(repo_type, f"{segments[0]}/{segments[1][:-4]}", body)
            return True
        return False

    def _route_api(self, method: str, segments: list[str], query: dict, body: bytes) -> bool:
        if segments == ["agent-harnesses"] and method == "GET":
            self._send_json({"standardEnvVars": [], "harnesses": {}})
        elif segments == ["whoami-v2"] and method == "GET":
            self._whoami()
        elif segments == ["validate-yaml"] and method == "POST":
            self._validate_yaml(body)
        elif segments == ["repos", "create"] and method == "POST":
            self._create_repo(body)
        elif len(segments) >= 3 and _split_repo_type(segments[0]) is not None:
            repo_type = _split_repo_type(segments[0])
            repo_id, rest = f"{segments[1]}/{segments[2]}", segments[3:]
            if not rest and method == "GET":
                self._repo_info(repo_type, repo_id, "main")
            elif len(rest) == 2 and rest[0] == "revision" and method == "GET":
                self._repo_info(repo_type, repo_id, rest[1])
            elif len(rest) >= 2 and rest[0] == "tree" and method == "GET":
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]), recursive)
            elif len(rest) == 2 and rest[0] == "preupload" and method == "POST":
                self._preupload(repo_type, repo_id, rest[1], body, query)
            elif len(rest) == 2 and rest[0] == "commit" and method == "POST":
                self._commit(repo_type, repo_id, rest[1], body, query)
            elif len(rest) == 2 and rest[0] == "branch" and method == "POST":
                self._create_branch(repo_type, repo_id, rest[1], body)
            else:
                return False
        else:
            return False
        return True

    # ------------------------------------------------------------------------------------------ endpoints
    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Unauthorized", None, {"X-Error-Message": "Invalid username or password."})
        self._send_json({
            "type": "user", "id": "0" * 24, "name": user, "fullname": user, "email": None, "emailVerified": False,
            "isPro": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "loopback", "role": "write"}},
        })

    def _validate_yaml(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        try:
            metadata = _front_matter(str(payload.get("content", "")))
        except HubError as error:
            self._send_json({"errors": [{"message": error.message}], "warnings": []}, status=400)
            return
        errors = []
        if metadata is not None:
            tags = metadata.get("tags")
            if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
                errors.append({"message": "\"tags\" must be a list of strings"})
            for key in ("library_name", "pipeline_tag", "license"):
                if key in metadata and not isinstance(metadata[key], str):
                    errors.append({"message": f"\"{key}\" must be a string"})
        self._send_json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    def _create_repo(self, body: bytes) -> None:
        hub = self.hub
        payload = json.loads(body or b"{}")
        user = self._user()
        name, namespace = payload.get("name"), payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}", name):
            raise HubError(400, f"Invalid repo name {name!r}")
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        repo_id = f"{namespace}/{name}"
        hub._check_write(repo_id, user)
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        with hub._lock:
            existing = hub.repos.get((repo_type, repo_id))
            if existing is not None:
                # The Hub answers a conflict with the existing repo's URL, which `create_repo(exist_ok=True)` reads.
                raise HubError(409, "You already created this repo", None, {"X-Error-Message": "Conflict"},
                               url=hub._repo_url(existing))
            repo = Repo(repo_type, repo_id, private, _now_iso())
            data = INITIAL_GITATTRIBUTES.encode()
            entry = FileEntry(hub._store_blob(data), len(data), git_blob_sha1(data), lfs=False)
            hub._new_commit(repo, "main", {".gitattributes": entry}, "initial commit", "")
            hub.repos[(repo_type, repo_id)] = repo
        self._send_json({"url": hub._repo_url(repo), "name": repo_id, "id": repo_id})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            hub._check_read(repo, self._user())
            commit = repo.resolve(revision)
            if commit is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            card_data = None
            if "README.md" in commit.files:
                try:
                    card_data = _front_matter(hub._read_blob(commit.files["README.md"].sha256).decode("utf-8"))
                except (HubError, UnicodeDecodeError):
                    card_data = None
            siblings = [
                {"rfilename": path, "size": entry.size, "blobId": entry.git_oid,
                 **({"lfs": {"size": entry.size, "sha256": entry.sha256, "pointerSize": LFS_POINTER_SIZE}}
                    if entry.lfs else {})}
                for path, entry in sorted(commit.files.items())
            ]
            info = {
                "id": repo_id, "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "author": repo_id.split("/")[0],
                "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "siblings": siblings,
                "tags": list((card_data or {}).get("tags") or []),
            }
            if card_data is not None:
                info["cardData"] = card_data
                for key in ("library_name", "pipeline_tag"):
                    if isinstance(card_data.get(key), str):
                        info[key] = card_data[key]
        self._send_json(info)

    def _tree(self, repo_type: str, repo_id: str, revision: str, prefix: str, recursive: bool) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            hub._check_read(repo, self._user())
            commit = repo.resolve(revision)
            if commit is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            prefix = prefix.strip("/")
            base = f"{prefix}/" if prefix else ""
            if prefix and not any(path.startswith(base) for path in commit.files):
                raise HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
            entries: dict[str, dict] = {}
            for path, entry in sorted(commit.files.items()):
                if not path.startswith(base):
                    continue
                parts = path[len(base):].split("/")
                for depth in range(1, len(parts)):
                    folder = base + "/".join(parts[:depth])
                    if recursive or depth == 1:
                        folder_oid = hashlib.sha1(folder.encode()).hexdigest()
                        entries.setdefault(folder, {"type": "directory", "oid": folder_oid, "size": 0, "path": folder})
                if recursive or len(parts) == 1:
                    item = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
                    if entry.lfs:
                        item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": LFS_POINTER_SIZE}
                    entries[path] = item
        self._send_json(list(entries.values()))

    def _preupload(self, repo_type: str, repo_id: str, revision: str, body: bytes, query: dict) -> None:
        hub = self.hub
        if query.get("create_pr"):
            raise HubError(400, "The loopback hub does not support pull requests")
        payload = json.loads(body or b"{}")
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            hub._check_write(repo_id, self._user())
            commit = repo.resolve(revision)
            if commit is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files = []
            for item in payload.get("files", []):
                path = _safe_repo_path(item.get("path", ""))
                size = int(item.get("size", 0))
                mode = hub._upload_mode(path, size)
                existing = commit.files.get(path)
                remote_oid = None
                if existing is not None and existing.lfs == (mode == "lfs"):
                    remote_oid = existing.sha256 if existing.lfs else existing.git_oid
                files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": remote_oid})
        self._send_json({"files": files, "commitOid": commit.oid})

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes, query: dict) -> None:
        hub = self.hub
        if query.get("create_pr"):
            raise HubError(400, "The loopback hub does not support pull requests")
        lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "NDJSON commit payload must start with a header line")
        header = lines[0]["value"]
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            hub._check_write(repo_id, self._user())
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
            head = repo.commits[repo.branches[revision]]
            parent = header.get("parentCommit")
            if parent is not None and parent != head.oid:
                raise HubError(412, f"A commit has happened since {parent}; head is {head.oid}")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                    data = base64.b64decode(value["content"], validate=True)
                    path = _safe_repo_path(value["path"])
                    files[path] = FileEntry(hub._store_blob(data), len(data), git_blob_sha1(data), lfs=False)
                elif key == "lfsFile":
                    path, oid = _safe_repo_path(value["path"]), value.get("oid", "")
                    if value.get("algo", "sha256") != "sha256" or not hub._blob_path(oid).exists():
                        raise HubError(422, f"LFS object {oid} for {path} was not uploaded")
                    size = hub._blob_path(oid).stat().st_size
                    if "size" in value and int(value["size"]) != size:
                        raise HubError(422, f"LFS object {oid} has size {size}, commit says {value['size']}")
                    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()
                    files[path] = FileEntry(oid, size, git_blob_sha1(pointer), lfs=True)
                elif key == "deletedFile":
                    path = _safe_repo_path(value["path"])
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = _safe_repo_path(value["path"].rstrip("/")) + "/"
                    doomed = [path for path in files if path.startswith(folder)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
                    for path in doomed:
                        del files[path]
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
            commit = hub._new_commit(repo, revision, files, str(header.get("summary", "")),
                                     str(header.get("description", "")))
        self._send_json({"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                         "commitUrl": f"{hub._repo_url(repo)}/commit/{commit.oid}"})

    def _create_branch(self, repo_type: str, repo_id: str, branch: str, body: bytes) -> None:
        hub = self.hub
        payload = json.loads(body or b"{}")
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            hub._check_write(repo_id, self._user())
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: {branch}")
            start = repo.resolve(payload.get("startingPoint") or "main")
            if start is None:
                raise HubError(404, f"Invalid rev id: {payload.get('startingPoint')}", "RevisionNotFound")
            repo.branches[branch] = start.oid
        self._send_json({})

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> None:
        hub = self.hub
        payload = json.loads(body or b"{}")
        with hub._lock:
            hub._get_repo(repo_type, repo_id)
            hub._check_write(repo_id, self._user())
        if payload.get("operation") != "upload":
            raise HubError(400, "the loopback hub serves LFS uploads only (downloads go through /resolve)")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "the loopback hub only offers the 'basic' LFS transfer")
        objects = []
        for item in payload.get("objects", []):
            oid, size = str(item.get("oid", "")), int(item.get("size", -1))
            path = hub._blob_path(oid)
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not (path.exists() and path.stat().st_size == size):
                answer["actions"] = {
                    "upload": {"href": f"{hub.endpoint}/__lfs__/upload/{oid}?size={size}", "header": {}},
                    "verify": {"href": f"{hub.endpoint}/__lfs__/verify/{oid}", "header": {}},
                }
            objects.append(answer)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _route_lfs_transfer(self, method: str, action: str, oid: str, body: bytes) -> bool:
        hub = self.hub
        if action == "upload" and method == "PUT":
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, f"uploaded content does not hash to {oid}")
            with hub._lock:
                hub._store_blob(body)
            self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})  # noqa: S324 - S3-style etag
            return True
        if action == "verify" and method == "POST":
            payload = json.loads(body or b"{}")
            path = hub._blob_path(oid)
            if not path.exists() or path.stat().st_size != int(payload.get("size", -1)):
                raise HubError(404, f"LFS object {oid} is missing or has the wrong size")
            self._send_json({"success": True})
            return True
        return False

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            hub._check_read(repo, self._user())
            commit = repo.resolve(revision)
            if commit is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            entry = commit.files.get(path)
            if entry is None:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
            data = hub._read_blob(entry.sha256)
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit.oid,
                   "ETag": f'"{entry.git_oid}"', "Accept-Ranges": "none"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        self._send(200, data, headers, head=method == "HEAD")


@contextlib.contextmanager
def running_hub(root: str | os.PathLike, **kwargs: Any):
    """`with running_hub(tmp_path) as hub:` -- a started `LoopbackHub`, stopped on exit (also on test failure)."""
    hub = LoopbackHub(root, **kwargs)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()
