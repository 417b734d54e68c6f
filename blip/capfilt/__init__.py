"""CapFilt, BLIP's dataset bootstrapping, as a library: `units` plans the work and keeps its resumable state,
`bootstrap` captions, scores and selects one unit's pairs. `blip capfilt` (blip/stages/capfilt.py) runs them."""
