"""A local GCS API for the tests: ``python tests/gcs_emulator.py PORT BUCKET``.

gcp-storage-emulator's handlers (the JSON API that gcsfs and tensorstore speak), served to
concurrent clients (its own server takes one connection at a time, and tensorstore opens many)
with one request handled at a time (its in-memory store is not thread-safe), and downloads
carrying their object's generation as GCS's do. Bucket ``locked``
exists but refuses every request with 403, as a bucket this account may not use. Prints
``ready`` once it listens.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from functools import partial
from http import server

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.handlers import buckets, objects
from gcp_storage_emulator.storage import Storage

LOCKED = "locked"
_LOCKED_PATH = re.compile(rf"(/upload|/download)?(/storage/v1)?/b/{LOCKED}(/|$)|^/{LOCKED}(/|$)")


class Handler(emulator.RequestHandler):
    lock = threading.Lock()

    def _route(self, method: str) -> None:
        try:
            if _LOCKED_PATH.match(self.path.split("?")[0]):
                body = json.dumps({"error": {"code": 403, "message":
                                             f"caller does not have access to bucket {LOCKED}"}})
                self.send_response(403)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())
                return
            with self.lock:
                emulator.Router(self).handle(method)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on this request (a retry or a killed process)

    def do_GET(self):
        self._route(emulator.GET)

    def do_POST(self):
        self._route(emulator.POST)

    def do_PUT(self):
        self._route(emulator.PUT)

    def do_DELETE(self):
        self._route(emulator.DELETE)

    def do_PATCH(self):
        self._route(emulator.PATCH)

    def log_message(self, *args):
        pass


def _with_generation(handler):
    # tensorstore takes an object's generation from this header (GCS sends it with every
    # object read) for its conditional writes; the emulator leaves it out.
    def read(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj.get("metageneration", "1")
        except Exception:  # not found: the handler answers 404
            pass
        return handler(request, response, storage, *args, **kwargs)
    return read


for _regex, _handlers in emulator.HANDLERS:
    for _method, _handler in list(_handlers.items()):
        if _handler in (objects.download, objects.get):
            _handlers[_method] = _with_generation(_handler)


class Server(server.ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True


def main(port: int, bucket: str) -> None:
    logging.disable(logging.CRITICAL)  # "Resource not found" for every existence probe
    storage = Storage(use_memory_fs=True)
    for name in (bucket, LOCKED):
        buckets.create_bucket(name, storage)
    httpd = Server(("localhost", port), partial(Handler, storage))
    print("ready", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
