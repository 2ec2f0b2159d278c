"""The app's service layer: what `app.py`'s event handlers call, with no UI framework in it.

`settings` reads the environment; `service.TaggerService` decodes uploads, runs the pipeline, keeps the annotation
queue and stores corrections, refusing bad requests with the errors of `errors`; `views` and `model_card` turn its
results into what the page shows. `app.py` lays out the page, wires its events to these, and shows the refusals.
"""
