"""`nesycd serve` and `nesycd export`: deploy a compiled program."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Optional

import typer

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add the `serve` and `export` commands to the main application."""
    app.command("serve")(serve)
    app.command("export")(export)


def serve(
    path: str = typer.Argument(
        ..., help="A compiled/ folder or its run folder; or a model folder written by save_pretrained, or a packaged id."
    ),
    host: str = typer.Option(
        "127.0.0.1", help="Address to bind. The server has no authentication; any other address exposes it."
    ),
    port: int = typer.Option(8000, help="TCP port; 0 picks a free one."),
    model_name: Optional[str] = typer.Option(
        None, help="Model id that clients pass as `model` (default: nesycd-<program>-<run id>, or the folder name)."
    ),
    max_tokens: Optional[int] = typer.Option(
        None, help="Generation limit in tokens when a request sets none (default: the compiled program's, else 256)."
    ),
    max_tokens_limit: int = typer.Option(2048, help="Largest max_tokens a chat request may ask for."),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body in bytes; larger bodies get 413."),
    student_model: Optional[str] = typer.Option(
        None, help="Compiled folders only: generate with this model instead of base + adapter, e.g. openai/<name>."
    ),
    student_api_base: Optional[str] = typer.Option(
        None, help="Base URL of the OpenAI-compatible server behind --student-model, e.g. http://127.0.0.1:8000/v1."
    ),
    verify_base: bool = typer.Option(
        True, "--verify-base/--no-verify-base", help="Check the base weights' sha256 against the manifest."
    ),
    max_requests: Optional[int] = typer.Option(None, help="Stop after responding to this many requests (default: never)."),
    max_seconds: Optional[float] = typer.Option(None, help="Stop after this many seconds (default: never)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
):
    """Serve a compiled program (POST /v1/answer) and its model (POST /v1/chat/completions, OpenAI-compatible).

    A plain model also loads LoRA adapters at runtime (POST /v1/load_lora_adapter, as vLLM does), so it can run
    the student stages of `nesycd compile --student-api-base`.
    """
    _setup_logging(verbose)
    from nesycd.errors import ConfigError
    from nesycd.serve import ServedModel, ServerConfig, make_server

    if max_tokens is not None and not 1 <= max_tokens <= max_tokens_limit:
        raise ConfigError(f"--max-tokens must be from 1 to --max-tokens-limit ({max_tokens_limit}), got {max_tokens}.")
    config = ServerConfig(
        max_body_bytes=max_body_bytes, max_tokens_limit=max_tokens_limit, max_requests=max_requests,
        max_seconds=max_seconds,
    )
    config.check()
    served = ServedModel.load(
        path, name=model_name, default_max_tokens=max_tokens, student_model=student_model,
        student_api_base=student_api_base, verify_base=verify_base,
    )
    try:
        server = make_server(served, host, port, config)
        if host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("Listening on %s: the server has no authentication, so anyone who reaches it can use it", host)
        signal.signal(signal.SIGTERM, lambda signum, frame: server.stop())
        typer.echo(f"Serving {served.name} ({served.kind}) at {server.url}")
        typer.echo(f"OpenAI base URL: {server.url}/v1  model: {served.name}")
        logger.info("Serving %s from %s at %s", served.name, served.source, server.url)
        try:
            server.run()
        except KeyboardInterrupt:
            logger.info("Interrupted")
        logger.info("Stopped after %d requests (%d server errors)", server.requests, server.server_errors)
    finally:
        served.close()


def export(
    path: Path = typer.Argument(..., help="A compiled/ folder or the run folder that contains it."),
    merged: Path = typer.Option(..., "--merged", help="Output folder for the merged weights, tokenizer, KB and README."),
    overwrite: bool = typer.Option(False, help="Replace the output folder's contents if it is not empty."),
    verify_base: bool = typer.Option(
        True, "--verify-base/--no-verify-base", help="Check the base weights' sha256 against the manifest."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
):
    """Merge the LoRA adapter into the base model and write a folder that vLLM or transformers loads."""
    _setup_logging(verbose)
    from nesycd.export import export_merged

    out_dir = export_merged(path, merged, overwrite=overwrite, verify_base=verify_base)
    typer.echo(f"Wrote merged weights, tokenizer and knowledge base to {out_dir}")
    typer.echo(f"Serve: vllm serve {out_dir.resolve()}  (see {out_dir / 'README.md'})")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "LiteLLM", "datasets", "transformers", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)
