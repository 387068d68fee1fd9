"""Experiment configs. Installed as the `jaxlm.configs` package so presets can import the base."""
