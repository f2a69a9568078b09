"""`lanner serve`: the OpenAI-compatible HTTP server (binds 127.0.0.1 unless --host says otherwise)."""
import logging
import os
import sys


def add_parser(subparsers):
    from lanner.cli import add_engine_args
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server", description=__doc__)
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LANNER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every request (default: $LANNER_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the base model's name in /v1/models and `model`")
    p.add_argument("--max-waiting", type=int, default=512,
                   help="admitted requests without a first token; more are refused with 503 + Retry-After")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="request bodies larger than this get 413")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds in-flight requests get to finish before they are ended cleanly")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N",
                   help="N engine replicas behind this server, each in its own process (or Ray actor); 1 runs the "
                        "engine in the server's process")
    p.add_argument("--distributed-executor", default="mp", choices=["mp", "ray"],
                   help="where data-parallel replicas run: mp = processes on this machine, ray = Ray actors (on the "
                        "Ray cluster RAY_ADDRESS names, else a local instance; needs `pip install ray`)")
    p.add_argument("--dp-routing", default="prefix", choices=["prefix", "round_robin", "least_tokens"],
                   help="how requests pick a replica: prefix = where their prompt's leading blocks were last served "
                        "(prefix-cache hits), held within one step's token budget of the least loaded replica")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-access-log", action="store_true")
    p.set_defaults(func=run)
    return p


def served_name(model_arg: str | None, model_path: str) -> str:
    if model_arg:
        return model_arg
    return os.path.splitext(os.path.basename(os.path.normpath(model_path)))[0]


def make_registry(name: str, engine, lora_specs: list[str]):
    """The served names; --lora adapters are validated at startup so a bad one stops the server early.
    engine: an LLMEngine or its EngineFacts (all a data-parallel server has)."""
    from functools import partial

    from lanner.cli import lora_requests
    from lanner.lora.adapter import load_adapter
    from lanner.server.async_engine import EngineFacts
    from lanner.server.errors import APIError
    from lanner.server.models import ModelRegistry
    facts = engine if isinstance(engine, EngineFacts) else EngineFacts.of(engine)
    validate = None
    if facts.lora_enabled:
        validate = partial(load_adapter, cfg=facts.model_config, max_rank=facts.cfg.max_lora_rank)
    modalities = ("text", "image") if facts.vision else ("text",)
    registry = ModelRegistry(name, facts.max_model_len, validate, modalities)
    for adapter, request in lora_requests(lora_specs).items():
        try:
            registry.load(adapter, request.lora_path)
        except APIError as e:
            raise ValueError(e.message) from e
    return registry


def engine_client(args):
    """The engine in this process, or --data-parallel-size replicas; and its EngineFacts."""
    if args.data_parallel_size < 1:
        raise ValueError(f"--data-parallel-size must be >= 1, got {args.data_parallel_size}")
    if args.data_parallel_size == 1:
        from lanner.cli import make_llm
        from lanner.server.async_engine import AsyncEngine
        client = AsyncEngine(make_llm(args).engine)
        return client, client.facts
    from lanner.cli import engine_kwargs
    from lanner.server.replicas import ReplicaSet, ReplicaSpec
    # unless told, the cores are shared out: replicas each taking every core would fight over them
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.data_parallel_size)
    spec = ReplicaSpec(args.model, engine_kwargs(args), threads)
    client = ReplicaSet.launch(spec, args.data_parallel_size, args.distributed_executor, args.dp_routing)
    facts = client.facts
    print(f"lanner: {facts.model_path} ({facts.model_config.architecture}) on {args.data_parallel_size} replicas "
          f"({args.distributed_executor}, {threads} torch threads each, routing {args.dp_routing})", file=sys.stderr)
    return client, facts


def run(args) -> int:
    import torch

    from lanner.server.app import ServerSettings, build_app
    from lanner.server.runner import Server

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    async_engine, facts = engine_client(args)
    name = args.served_model_name or served_name(args.model, facts.model_path)
    registry = make_registry(name, facts, args.lora)
    settings = ServerSettings(api_key=args.api_key, max_waiting=args.max_waiting,
                              max_body_bytes=int(args.max_body_mb * (1 << 20)))
    app = build_app(async_engine, registry, settings)
    print(f"lanner: serving {registry.base_name!r} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}", file=sys.stderr)
    Server(app, async_engine, grace_s=args.shutdown_timeout, host=args.host, port=args.port,
           log_level=args.log_level, access_log=not args.no_access_log).run()
    return 0
