"""A stand-in for the HuggingFace Hub's download endpoints, on 127.0.0.1, for tests.

It answers with the Hub's status codes and headers (X-Repo-Commit, ETag, X-Linked-Etag,
X-Linked-Size, X-Error-Code), redirects LFS files (*.safetensors) to a separate file store
(another port, so another origin), counts requests, and records whether an Authorization
header ever reached the file store. The test suite checks it against the real Python
client (huggingface_hub.snapshot_download), so it cannot drift from the protocol.
"""
import hashlib
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "hf_standin_secret_token_123"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Hub:
    def __init__(self):
        self.repos = {}  # repo -> {"private": bool, "refs": {name: sha}, "commits": {sha: {path: bytes}}}
        self.requests = []  # (server, method, path)
        self.store_auth_seen = []
        # repo -> "truncate" | "badsha" | "traversal" | "ghostfile" | "unauthorized" | "silent"
        # (no answer for 30 s) | "stall" (half a file, then 30 s of nothing) | "nolength" (half
        # a file without Content-Length, then a clean close) | "protorel" (a protocol-relative
        # redirect to the file store)
        self.faults = {}
        self.ranges = []  # (file, start) of ranged requests
        self.lock = threading.Lock()
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("hub"))
        self.store = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("store"))
        for s in (self.hub, self.store):
            threading.Thread(target=s.serve_forever, daemon=True).start()
        self.endpoint = "http://127.0.0.1:%d" % self.hub.server_address[1]
        self.store_url = "http://127.0.0.1:%d" % self.store.server_address[1]
        self.blobs = {}  # sha256 -> bytes
        self.parts = {}  # sha256 -> {part number: bytes}
        self.multipart_threshold = 64 * 1024
        self.chunk_size = 32 * 1024
        self.commits_made = []  # (repo, summary, [paths])

    def close(self):
        for s in (self.hub, self.store):
            s.shutdown()
            s.server_close()

    def add(self, repo, files, private=False, branch="main"):
        """Commits `files` ({path: bytes}) to `repo`; returns the commit sha."""
        sha = hashlib.sha1(json.dumps(sorted((k, git_sha1(v)) for k, v in files.items())).encode() + repo.encode()).hexdigest()
        r = self.repos.setdefault(repo, {"private": private, "refs": {}, "commits": {}})
        r["private"] = private
        r["commits"][sha] = dict(files)
        r["refs"][branch] = sha
        for v in files.values():
            self.blobs[hashlib.sha256(v).hexdigest()] = v
        return sha

    def count(self, server="hub"):
        with self.lock:
            return sum(1 for s, _, _ in self.requests if s == server)

    def _handler(hub_self, which):
        hub = hub_self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, status, headers=None, body=b"", head=False, declared=None, stall=0.0):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if declared != "none":
                    self.send_header("Content-Length", str(len(body) if declared is None else declared))
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                    self.wfile.flush()
                time.sleep(stall)
                if declared is not None:
                    self.close_connection = True

            def _error(self, status, code, head=False):
                self._send(status, {"X-Error-Code": code, "Content-Type": "application/json"},
                           json.dumps({"error": code}).encode(), head)

            def _repo(self, repo, head=False):
                r = hub.repos.get(repo)
                auth = self.headers.get("Authorization")
                if hub.faults.get(repo) == "unauthorized":
                    self._send(401, {"Content-Type": "application/json"}, b'{"error": "Invalid credentials"}', head)
                    return None
                if r is None or (r["private"] and auth != "Bearer " + TOKEN):
                    self._error(401, "RepoNotFound", head)
                    return None
                return r

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n)

            def _authed(self):
                return self.headers.get("Authorization") == "Bearer " + TOKEN

            def do_PUT(self):
                path = urllib.parse.urlsplit(self.path).path
                body = self._body()
                with hub.lock:
                    hub.requests.append((which, "PUT", path))
                if which != "store":
                    return self._send(405)
                if self.headers.get("Authorization"):
                    hub.store_auth_seen.append(path)
                parts = path.split("/")
                if parts[1] == "upload":
                    oid = parts[2]
                    if hashlib.sha256(body).hexdigest() != oid:
                        return self._send(400, body=b"sha256 mismatch")
                    hub.blobs[oid] = body
                    return self._send(200)
                if parts[1] == "part":
                    hub.parts.setdefault(parts[2], {})[int(parts[3])] = body
                    return self._send(200, {"ETag": '"%s"' % hashlib.md5(body).hexdigest()})
                self._send(404)

            def do_POST(self):
                path = urllib.parse.urlsplit(self.path).path
                body = self._body()
                with hub.lock:
                    hub.requests.append((which, "POST", path))
                parts = [urllib.parse.unquote(p) for p in path.split("/")]
                if which == "store":
                    if self.headers.get("Authorization"):
                        hub.store_auth_seen.append(path)
                    if parts[1] == "complete":
                        oid = parts[2]
                        req = json.loads(body)
                        chunks = hub.parts.get(oid, {})
                        data = b"".join(chunks[p["partNumber"]] for p in sorted(req["parts"], key=lambda p: p["partNumber"]))
                        if hashlib.sha256(data).hexdigest() != oid:
                            return self._send(400, body=b"sha256 mismatch")
                        hub.blobs[oid] = data
                        return self._send(200, {"Content-Type": "application/json"}, b"{}")
                    return self._send(404)
                if not self._authed():
                    return self._error(401, "Unauthorized")
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = (req.get("organization") or "user") + "/" + req["name"]
                    if repo in hub.repos:
                        return self._send(409, {"Content-Type": "application/json"}, b'{"error": "exists"}')
                    hub.repos[repo] = {"private": bool(req.get("private")), "refs": {}, "commits": {}}
                    return self._send(200, {"Content-Type": "application/json"}, json.dumps({"url": hub.endpoint + "/" + repo}).encode())
                # /api/models/{o}/{n}/preupload/{rev} and /commit/{rev}
                if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] in ("preupload", "commit"):
                    repo = parts[3] + "/" + parts[4]
                    rev = "/".join(parts[6:])
                    r = hub.repos.get(repo)
                    if r is None:
                        return self._error(404, "RepoNotFound")
                    if parts[5] == "preupload":
                        req = json.loads(body)
                        out = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") or f["size"] > 10_000_000 else "regular",
                                "shouldIgnore": False} for f in req["files"]]
                        return self._send(200, {"Content-Type": "application/json"}, json.dumps({"files": out}).encode())
                    lines = [json.loads(l) for l in body.decode().splitlines() if l.strip()]
                    parent = r["refs"].get(rev)
                    files = dict(r["commits"][parent]) if parent else {}
                    summary = ""
                    import base64
                    for l in lines:
                        k, v = l["key"], l["value"]
                        if k == "header":
                            summary = v.get("summary", "")
                        elif k == "file":
                            files[v["path"]] = base64.b64decode(v["content"])
                        elif k == "lfsFile":
                            data = hub.blobs.get(v["oid"])
                            if data is None or len(data) != v["size"]:
                                return self._send(400, body=b"missing lfs object")
                            files[v["path"]] = data
                        elif k == "deletedFile":
                            files.pop(v["path"], None)
                    sha = hub.add(repo, files, private=r["private"], branch=rev)
                    hub.commits_made.append((repo, summary, sorted(files)))
                    return self._send(200, {"Content-Type": "application/json"},
                                      json.dumps({"commitOid": sha, "commitUrl": hub.endpoint + "/" + repo + "/commit/" + sha}).encode())
                # /{o}/{n}.git/info/lfs/objects/batch and .../verify
                if len(parts) >= 5 and parts[2].endswith(".git") and parts[3:5] == ["info", "lfs"]:
                    req = json.loads(body)
                    if parts[-1] == "verify":
                        ok = hub.blobs.get(req["oid"]) is not None and len(hub.blobs[req["oid"]]) == req["size"]
                        return self._send(200 if ok else 404, {"Content-Type": "application/json"}, b"{}")
                    objs = []
                    multipart = any(o["size"] > hub.multipart_threshold for o in req["objects"]) and "multipart" in req.get("transfers", [])
                    for o in req["objects"]:
                        oid, size = o["oid"], o["size"]
                        entry = {"oid": oid, "size": size, "authenticated": True}
                        if oid not in hub.blobs:
                            verify = {"href": hub.endpoint + "/" + parts[1] + "/" + parts[2] + "/info/lfs/objects/verify", "header": {}}
                            if multipart and size > hub.multipart_threshold:
                                n = (size + hub.chunk_size - 1) // hub.chunk_size
                                header = {"chunk_size": str(hub.chunk_size)}
                                for i in range(1, n + 1):
                                    header["%05d" % i] = hub.store_url + "/part/%s/%d" % (oid, i)
                                entry["actions"] = {"upload": {"href": hub.store_url + "/complete/" + oid, "header": header}, "verify": verify}
                            else:
                                entry["actions"] = {"upload": {"href": hub.store_url + "/upload/" + oid, "header": {}}, "verify": verify}
                        objs.append(entry)
                    return self._send(200, {"Content-Type": "application/vnd.git-lfs+json"},
                                      json.dumps({"transfer": "multipart" if multipart else "basic", "objects": objs}).encode())
                self._send(404)

            def do_HEAD(self):
                self.do_GET(head=True)

            def do_GET(self, head=False):
                path = urllib.parse.urlsplit(self.path).path
                with hub.lock:
                    hub.requests.append((which, self.command, path))
                if which == "store":
                    if self.headers.get("Authorization"):
                        hub.store_auth_seen.append(path)
                    data = hub.blobs.get(path.rsplit("/", 1)[-1])
                    if data is None:
                        return self._send(404, head=head)
                    start = 0
                    rng = self.headers.get("Range")
                    if rng and rng.startswith("bytes="):
                        start = int(rng[6:].split("-")[0])
                    status = 206 if start else 200
                    return self._send(status, {"Content-Type": "application/octet-stream"}, data[start:], head)
                parts = [urllib.parse.unquote(p) for p in path.split("/")]
                # /api/models/{owner}/{name}/revision/{rev}
                if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] == "revision":
                    repo = parts[3] + "/" + parts[4]
                    if hub.faults.get(repo) == "silent":
                        time.sleep(30)
                    r = self._repo(repo, head)
                    if r is None:
                        return
                    rev = "/".join(parts[6:])
                    sha = r["refs"].get(rev, rev if rev in r["commits"] else None)
                    if sha is None:
                        return self._error(404, "RevisionNotFound", head)
                    files = list(r["commits"][sha])
                    if hub.faults.get(repo) == "ghostfile":
                        files.append("model-00009-of-00009.safetensors")
                    if hub.faults.get(repo) == "traversal":
                        files.append("../../escape.txt")
                    body = json.dumps({"id": repo, "modelId": repo, "sha": sha, "private": r["private"],
                                       "siblings": [{"rfilename": f} for f in files]}).encode()
                    return self._send(200, {"Content-Type": "application/json"}, body, head)
                # /api/models/{owner}/{name}/tree/{rev}[/{path}]  (recursive listing)
                if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] == "tree":
                    repo = parts[3] + "/" + parts[4]
                    r = self._repo(repo, head)
                    if r is None:
                        return
                    rev = parts[6]
                    sha = r["refs"].get(rev, rev if rev in r["commits"] else None)
                    if sha is None:
                        return self._error(404, "RevisionNotFound", head)
                    entries = []
                    for f, data in sorted(r["commits"][sha].items()):
                        e = {"type": "file", "oid": git_sha1(data), "size": len(data), "path": f}
                        if f.endswith(".safetensors"):
                            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                        entries.append(e)
                    return self._send(200, {"Content-Type": "application/json"}, json.dumps(entries).encode(), head)
                # /{owner}/{name}/resolve/{rev}/{path...}
                if len(parts) >= 6 and parts[3] == "resolve":
                    repo = parts[1] + "/" + parts[2]
                    r = self._repo(repo, head)
                    if r is None:
                        return
                    rev, fname = parts[4], "/".join(parts[5:])
                    sha = r["refs"].get(rev, rev if rev in r["commits"] else None)
                    if sha is None:
                        return self._error(404, "RevisionNotFound", head)
                    data = r["commits"][sha].get(fname)
                    if data is None:
                        return self._error(404, "EntryNotFound", head)
                    fault = hub.faults.get(repo)
                    common = {"X-Repo-Commit": sha}
                    if fname.endswith(".safetensors"):
                        digest = hashlib.sha256(data).hexdigest()
                        linked = hashlib.sha256(b"other").hexdigest() if fault == "badsha" else digest
                        hdr = dict(common, **{"ETag": '"%s"' % linked, "X-Linked-Etag": '"%s"' % linked,
                                              "X-Linked-Size": str(len(data)),
                                              "Location": hub.store_url + "/lfs/" + digest})
                        if fault == "protorel":
                            hdr["Location"] = hub.store_url.replace("http:", "") + "/lfs/" + digest
                        return self._send(302, hdr, b"", head)
                    hdr = dict(common, **{"ETag": '"%s"' % git_sha1(data), "Content-Type": "application/octet-stream"})
                    if fault == "truncate" and not head:
                        return self._send(200, hdr, data[: len(data) // 2], head, declared=len(data))
                    if fault == "stall" and not head:
                        return self._send(200, hdr, data[: len(data) // 2], head, declared=len(data), stall=30)
                    if fault == "nolength":
                        return self._send(200, dict(hdr, Connection="close"), data[: len(data) // 2], head, declared="none")
                    rng = self.headers.get("Range")
                    if rng and rng.startswith("bytes=") and not head:
                        start = int(rng[6:].split("-")[0])
                        hub.ranges.append((fname, start))
                        return self._send(206, hdr, data[start:], head)
                    return self._send(200, hdr, data, head)
                self._send(404, head=head)

        return H
