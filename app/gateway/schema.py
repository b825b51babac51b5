"""What every route-file model shares: the strict base, and the methods a route may take."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class Strict(BaseModel):
    # Errors never repeat the input: a value may hold a secret put there by ${VAR}, and a
    # ValidationError's text reaches tracebacks (the release phase, a worker's start).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
