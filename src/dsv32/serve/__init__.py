"""`dsv32 serve`: an OpenAI-compatible HTTP API (plus DeepSeek's extensions) and a chat page over the engine.

- `protocol`: request models, OpenAI-shaped errors (`APIError`), reading and bounding a request body;
- `app`: `create_app` (the FastAPI app, its state, the endpoints, SSE streaming, the Host/Origin guard);
- `cli`: `dsv32 serve` (`cli_main`, `serve` running uvicorn with a graceful drain, `detect_family`).

Chat formats and the streamed assistant message live in `dsv32.chat`; incremental detokenising in
`dsv32.tokenizer.Detokenizer`; batching, the cache and sampling in `dsv32.engine`.
"""

from dsv32.serve.app import create_app
from dsv32.serve.protocol import APIError

__all__ = ["APIError", "create_app"]
