"""The personalized captioning service: concept store, API, captioner and retriever.

Plain Python (no `ray` import); `deploy/serve_app.py` wraps these as Ray Serve
deployments.
"""
