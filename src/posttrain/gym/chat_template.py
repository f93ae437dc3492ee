"""The bundled model's ChatML chat template, with tool schemas and tool calls.

Tools are listed in the system turn one per line as `- name(arg: type, ...): description`
(`tool_listing` gives the same text in Python, and the pretraining corpus uses it in its API
listings), and an assistant call is written `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
the same JSON that `tools.render_call` writes and `tools.parse_tool_calls` reads. Tool results
are turns of role `tool`.
"""

from __future__ import annotations

TOOL_INSTRUCTIONS = 'Call a tool with <tool_call>{"name": ..., "arguments": {...}}</tool_call>'

CHAT_TEMPLATE = (
    "{%- set ns = namespace(start=0) -%}"
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n' }}{%- set ns.start = 1 -%}{%- endif -%}"
    "{{ 'Tools:\\n' }}"
    "{%- for t in tools -%}"
    "{%- set f = t['function'] if t['function'] is defined else t -%}"
    "{{ '- ' + f['name'] + '(' }}"
    "{%- for k, v in f['parameters']['properties'].items() -%}"
    "{{ k + ': ' + v['type'] }}{%- if not loop.last -%}{{ ', ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{{ '): ' + f['description'] + '\\n' }}"
    "{%- endfor -%}"
    "{{ '" + TOOL_INSTRUCTIONS + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages[ns.start:] -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' + (m['content'] or '') }}"
    "{%- for tc in (m['tool_calls'] or []) -%}"
    "{%- set f = tc['function'] if tc['function'] is defined else tc -%}"
    "{{ '<tool_call>{\"name\": \"' + f['name'] + '\", \"arguments\": ' }}"
    "{%- if f['arguments'] is string -%}{{ f['arguments'] }}{%- else -%}{{ f['arguments'] | tojson }}{%- endif -%}"
    "{{ '}</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def tool_listing(tools: list[dict]) -> str:
    """The tools block of the system turn, as the template renders it."""
    lines = ["Tools:"]
    for t in tools:
        f = t.get("function", t)
        args = ", ".join(f"{k}: {v['type']}" for k, v in f["parameters"]["properties"].items())
        lines.append(f"- {f['name']}({args}): {f['description']}")
    return "\n".join(lines) + "\n" + TOOL_INSTRUCTIONS
