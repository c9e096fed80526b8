"""The lab: the experiments around the product (the knowledge world, the demo model, the
evaluation harness, meta-training, the trust, scaling and forgetting studies).

Nothing the service runs at request or ingest time imports it, and it imports nothing from
`service/`: it drives the service, where it must, as child processes over HTTP (`live.py`).
"""
