"""Interactive refinement of a segment with points and boxes, gathered in one package; each file's name says its
layer. volume_*: the volume layer (`volume_session`: the SAM2 session, `volume_prompts`, `volume_history`,
`volume_features`: per-slice SAM2 features, `volume_preview`); server_*: the service layer (`server_service`,
`server_schemas`: the HTTP session and its request models); `command_cli`: `citrusv refine`. A volume_* module
imports no server_* or command module (Testing/backend/test_import_layers.py)."""
