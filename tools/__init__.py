"""Maintainer tools of this repository: they import the unialign library, it never imports them.

- :mod:`tools.make_prompts` writes the bundled prompt set (``python tools/make_prompts.py``).
- :mod:`tools.bundled_card` rewrites the bundled dataset's card (``python -m tools.bundled_card``).
"""
