"""The long-running system around the learning core: settings, API, queue, stores, worker, CLI."""
