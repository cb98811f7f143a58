"""The small shared core every stage uses: names, config, artifacts, llama.cpp, data."""
