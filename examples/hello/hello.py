"""A minimal warmstart function: ``warmstart deploy examples/hello --name hello``."""

import os


def handler(event, context):
    name = event.get("name", "world") if isinstance(event, dict) else "world"
    print(f"saying hello to {name}")
    return {"message": f"Hello, {name}!", "request_id": context.aws_request_id, "pid": os.getpid()}
