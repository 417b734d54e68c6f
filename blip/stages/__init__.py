"""One thin `main(argv)` per pipeline stage; `dvc.yaml` runs them through the `blip` command."""
