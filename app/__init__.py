"""The lora-diffusion workbench: a Gradio app over the library (no ML logic lives here).

Installed as `lora_diffusion.app` (the wheel carries this folder); started with
`lora-diffusion app` or `python -m lora_diffusion.app`. One module per tab, each with
its layout function (`tab(ctx)`) and its handlers at module level, so the handlers can be
called and tested without a browser.
"""
