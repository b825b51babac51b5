"""The hello-world peer for bench/cache.py: Flask's minimal application, nothing else."""
from flask import Flask

app = Flask(__name__)


@app.route("/")
def hello():
    return "Hello, World!"
