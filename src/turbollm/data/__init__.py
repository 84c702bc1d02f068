"""Data shipped with the package: the default text of `turbollm quality` (CC0, written for turbollm)."""
