"""The evaluation lab on top of the library: the command line, the benchmark and tuner, metrics, the
embedded model and its training, tiny offline pipelines. The library (engine, policies, adapters,
integration, configs) never imports this package (tests/test_layers.py)."""
