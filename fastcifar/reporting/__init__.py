"""The reading half: results JSONs -> statistics -> reports and the rendered tables. Imports no torch, so
`make docs-check` runs on any Python."""
