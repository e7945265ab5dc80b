"""The data stages: ingest (sources.py), translate (translate.py), normalize (normalize.py), each checked by the
great-expectations contracts of contracts.py before it writes its output. `bundled/` holds the project's own small
multilingual sample sets (the tiny profile's data)."""

import logging

# great-expectations logs hundreds of INFO lines while it imports; a stage's log should show the stage.
logging.getLogger("great_expectations").setLevel(logging.WARNING)
