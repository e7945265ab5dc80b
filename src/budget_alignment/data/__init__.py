"""The data stages, one module each: ingest.py, translate.py, normalize.py.

Beneath them: sources.py reads a source (hub, hub mirror, local file, bundled set) and loaders.py maps its rows to
`Problem` records; spans.py protects what translation must not change, translation_backends.py and
translation_cache.py do the asking and the remembering; contracts.py names each stage's great-expectations suite,
expectations.py holds its rules, validation.py runs it and decides the quarantine, quarantine.py writes what was
accepted and what was rejected. `bundled/` holds the project's own small multilingual sample sets (the tiny profile's
data).
"""

import logging

# great-expectations logs hundreds of INFO lines while it imports; a stage's log should show the stage.
logging.getLogger("great_expectations").setLevel(logging.WARNING)
