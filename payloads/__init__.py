"""Job executables for the demo and the end-to-end tests (DESIGN.md section 9).

Small, pure Python, shipped with the project: they do real, checkable work instead of ``sleep``.

- ``wms-payload-map`` (:func:`payloads.histo.map_main`): reads seed files, generates events
  deterministically from each seed and fills a histogram, written to ``$WMS_OUTPUT_DIR/hist.json``.
- ``wms-payload-merge`` (:func:`payloads.histo.merge_main`): sums the histograms it is given into
  one; refuses histograms of different binning.
- ``wms-payload-noop`` (:func:`payloads.noop.main`): exits 0 at once (throughput benchmarks).

The runtime convention (what a pilot gives a job) is read by :mod:`payloads.runtime`. Nothing here
imports Django or any app of the WMS.
"""
