"""What a running daemon tells Prometheus: ``GET /metrics``.

    exposition   counters, gauges, histograms; the 0.0.4 text format
    events       process-wide counts of backend events (NBD, upstream)
    registry     the daemon's families, fed by its servers, read from its
                 ticket store and the process at each scrape

Everything is counted once per connection, request or event, never per
chunk of data, so the data path costs nothing more for being watched.
"""
