"""The cascade inference engine.

Knows neither bittensor nor any model library: it talks to tiers through the small interface in
`cascade.tier` and is configured from the slice of the root YAML described in `cascade.config`.
"""
