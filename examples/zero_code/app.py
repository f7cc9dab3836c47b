"""An ordinary openai program: no Tokenlay code besides attribution.

Run it under `opentelemetry-instrument`; the `tokenlay` instrumentor routes its calls
through Tokenlay (TOKENLAY_KEY) and traces them.
"""

import openai

from tokenlay_otel import metadata

client = openai.OpenAI()  # OPENAI_API_KEY / OPENAI_BASE_URL as usual

for user, org in [("alice", "acme"), ("bob", "acme"), ("carol", "globex")]:
    with metadata(user=user, org=org):
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"Hi, I am {user}."}]
        )
    print(f"{user}@{org}: {reply.choices[0].message.content}")
