"""The good4cir review app (Gradio): review, pipeline, stats, export and retrieve tabs.

    from ui.app import build_app        # gr.Blocks over a store, nothing launched
    from ui.server import serve, AppServer, create_server_app

The tabs' logic lives in plain modules (review_logic, pipeline_logic, stats_logic,
export_logic, retrieve_logic) that import no Gradio; security holds binding, login,
image allow-listing and escaping. Nothing imports ui.
"""
