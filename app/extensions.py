"""Extension singletons, created here and bound to an app in ``init_app``."""
from __future__ import annotations

from pathlib import Path

import redis
from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
migrate = Migrate()

# Redis is short-fused: when it is slow or down the gateway degrades (breakers fall back
# to closed) rather than holding a request for the default of no timeout at all.
REDIS_SOCKET_TIMEOUT = 0.5  # seconds


def init_app(app: Flask) -> None:
    """Bind the database, migrations and (when ``REDIS_URL`` is set) a Redis client."""
    db.init_app(app)
    migrate.init_app(app, db, directory=str(Path(app.root_path).parent / "migrations"))
    url = app.config["REDIS_URL"]
    app.extensions["redis"] = (
        redis.Redis.from_url(
            url,
            socket_timeout=REDIS_SOCKET_TIMEOUT,
            socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
            health_check_interval=30,
        )
        if url
        else None
    )


def redis_client(app: Flask) -> redis.Redis | None:
    """Return the app's Redis client, or None on the embedded default."""
    return app.extensions["redis"]
