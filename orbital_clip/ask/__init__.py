"""The paper's second step run end to end: step prompts from metadata, an OpenAI-compatible chat
endpoint asked about every image, answers collected into the scorer's CSVs (ask_models.py)."""
