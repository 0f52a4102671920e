"""The paper's method: prompts, extraction, token selection and labels, vectors, steering hooks, decoding, the
protocol, models, enrichment, resource guards. Imports torch and numpy, never pandas or a notebook's module; the one
cache it keeps is the bundled models' dense conversions (`models`)."""
