"""The small shared core every stage uses (names, config, layout, artifacts, llama.cpp, data, the merge's
plan/write/checks), the orchestrator's modules (specs, pipeline, keys, runtimes) and tooling that no
stage imports (lockfile: `invoke lock`; ci: the CI report and release notes)."""
