"""Stage 6 of the pipeline, an interface: the HTTP service (FastAPI + uvicorn, the ``serve`` extra).

``workers.py`` runs the supervisor and its worker processes; in each worker ``app.py`` holds the routes,
``handlers.py`` the request path as plain functions, ``batching.py`` shares forward passes, ``backends.py``
computes them (torch or onnxruntime). A new route is a module-level function in ``app.py`` registered in
``_routes``.
"""
