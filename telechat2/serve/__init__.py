"""`telechat2 serve`: an HTTP server for TeleChat2 (FastAPI + uvicorn).

Speaks the two dialects TeleChat2's users already call: TGI/MindIE (`/generate`, `/generate_stream`, the seed's
deployment target) and OpenAI (`/v1/chat/completions`, `/v1/completions`, `/v1/models`), plus Triton-style health
(`/v2/health/*`) and Prometheus `/metrics`.

Modules: `app` (CLI, app factory, health and metrics routes), `tgi` and `openai_api` (the two dialects), `runtime`
(limits and one generation run), `scheduler` (bounded queue + one generation thread running continuous batching),
`engine` (the model behind a small interface; batches from `telechat2.batched`), `text` (incremental
detokenization and stop strings), `distributed` (msrun lockstep), `schemas`, `metrics`, `auth`.
Importing the package never imports MindSpore: the engine module imports it only when the real model is loaded.
"""
