"""The cloud side (torch): ingest server, sample store, distillation trainer, update publisher, rollouts.

- ``config``: ``CloudConfig`` / ``TrainerConfig``, ``load_config(home, overrides)`` (flags > env > TOML > defaults).
- ``admin``: cloud home (``init_home``), admin operations shared by the CLI and the admin API (``push``, ...).
- ``store``: repositories for samples, versions and the fleet over one transaction type; ``SQLiteStore`` (SQLite
  WAL + blob directory, the default) and ``PostgresStore`` (PostgreSQL + S3-compatible blobs).
- ``edge_model``: ``rebuild_edge_model(bundle, params)``, ``extract_params``, ``load_teacher``.
- ``trainer``: ``Trainer`` (CEMA distillation, replay, gate; ``train_now()``; background thread).
- ``service``: ``CloudService`` (ingest, heartbeats, per-device update packages).
- ``server``: ``create_app(service)`` (FastAPI), ``ServerThread`` (uvicorn in a thread), ``serve``.
- ``bench_update``: ``run_update_bench`` (bytes and accuracy per compression mode).
"""
