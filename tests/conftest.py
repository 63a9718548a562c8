import os

# Tests never reach a model hub: every model is built from a config and saved locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("MAVSR_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
