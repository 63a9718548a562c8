"""`mavsr serve`: the transcription server (app.py), its dynamic batcher (batcher.py) and the elastic
controller that picks a rate pair per batch (elastic.py)."""
