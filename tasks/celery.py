"""Entry point for ``celery -A tasks``: the Celery app of a freshly created gateway app."""
from app import create_app

app = create_app().extensions["celery"]
