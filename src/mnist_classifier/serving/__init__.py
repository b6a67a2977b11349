"""Stage 6 of the pipeline, an interface: the HTTP service (FastAPI + uvicorn, the ``serve`` extra).

``handlers.py`` is the request path as plain functions, ``schemas.py`` the bodies, ``app.py`` the routes.
A new route is a module-level function in ``app.py`` registered in ``create_app``.
"""
