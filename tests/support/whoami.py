"""Small real servers that answer with their own name: an HTTP/1.1 server (JSON: who, path, the
destination header it received) and a gRPC server with KServe V2 `ModelInfer` (the response's
model_version is the server's name). Stand-ins for agents where only "who answered" matters
(the gateway harness and the nginx map), never for an agent's behaviour."""
from __future__ import annotations

import json
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from tritonclient.grpc import service_pb2

from tests.support.envoy import DEST_HEADER
from tests.support.net import free_port


class WhoAmI:
    """An HTTP/1.1 server and a gRPC server that answer with their name (and what they received)."""

    def __init__(self, name: str):
        self.name = name
        me = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                n = int(self.headers.get("content-length") or 0)
                self.rfile.read(n)
                body = json.dumps({"who": me.name, "path": self.path, "dest_header": self.headers.get(DEST_HEADER)}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *a):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_addr = f"127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

        def infer(req: bytes, context) -> bytes:
            model = service_pb2.ModelInferRequest.FromString(req).model_name
            return service_pb2.ModelInferResponse(model_name=model, model_version=me.name).SerializeToString()

        self.grpc_port = free_port()
        self.grpc_addr = f"127.0.0.1:{self.grpc_port}"
        self.grpc = grpc.server(futures.ThreadPoolExecutor(4))
        self.grpc.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)})])
        self.grpc.add_insecure_port(self.grpc_addr)
        self.grpc.start()

    def stop(self) -> None:
        self.http.shutdown()
        self.grpc.stop(0).wait()
