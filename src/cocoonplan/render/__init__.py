"""Renderers. All of them start from one document (:func:`document.plan_document`), so they
cannot disagree. The package imports nothing itself: ``render.escape`` is used by commands
that must not load jinja2 and the templates."""
