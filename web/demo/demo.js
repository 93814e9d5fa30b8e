// The demo editor: Generate calls the metered route through credits.js,
// which keeps the badge current and shows the notice on a 402. A module:
// it imports credits.js as any frontend does.
import { Credits } from '/credits.js';

{
	// The org is fixed for the demo. In production the gateway takes it from
	// authentication (a forward_auth answer, a verified token), never from
	// anything the page sends.
	const ORG = 'demo';

	const button = document.getElementById('generate');
	const prompt = document.getElementById('prompt');
	const editor = document.getElementById('editor');
	const status = document.getElementById('status');

	// The badge's first value, from credits_balance (charges nothing). A
	// refresh that fails rejects: the page says so.
	Credits.refresh('/credits/balance', { headers: { 'X-Org-Id': ORG } }).catch((err) => {
		status.textContent = 'The balance could not be read: ' + err.message;
	});

	async function generate() {
		button.disabled = true;
		status.textContent = 'Generating…';
		try {
			const resp = await Credits.fetch('/rich-text/generate', {
				method: 'POST',
				headers: { 'X-Org-Id': ORG, 'Content-Type': 'application/json' },
				body: JSON.stringify({ prompt: prompt.value }),
			});
			if (resp.status === 402) {
				// credits.js shows the notice; the editor itself still works.
				status.textContent = 'Not generated: no credits left.';
				return;
			}
			if (!resp.ok) {
				status.textContent = 'Not generated: the AI service answered ' + resp.status + '.';
				return;
			}
			const body = await resp.json();
			// The AI's HTML is read as text: nothing it sends runs in the page.
			const text = new DOMParser().parseFromString(body.html || '', 'text/html').body.textContent;
			const p = document.createElement('p');
			p.className = 'generated';
			p.textContent = text;
			editor.append(p);
			status.textContent = 'Generated a paragraph.';
		} catch (err) {
			status.textContent = 'Not generated: ' + err.message;
		} finally {
			button.disabled = false;
		}
	}

	button.addEventListener('click', generate);

	// Stream asks for a streamed paragraph (server-sent events), charged the
	// price of the tokens it reports: the badge shows the balance after the
	// call's hold, then, once the stream has ended, the balance after its
	// real charge (credits.js reads credits_balance again).
	const streamButton = document.getElementById('stream');
	async function stream() {
		streamButton.disabled = true;
		status.textContent = 'Streaming…';
		try {
			const resp = await Credits.fetch('/rich-text/stream', {
				method: 'POST',
				headers: { 'X-Org-Id': ORG, 'Content-Type': 'application/json' },
				body: JSON.stringify({ prompt: prompt.value, stream: true }),
			});
			if (!resp.ok) {
				status.textContent = resp.status === 402 ? 'Not streamed: no credits left.' : 'Not streamed: the AI service answered ' + resp.status + '.';
				return;
			}
			const p = document.createElement('p');
			p.className = 'generated streamed';
			editor.append(p);
			const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
			let rest = '';
			for (;;) {
				const { value, done } = await reader.read();
				if (done) {
					break;
				}
				rest += value;
				const lines = rest.split('\n');
				rest = lines.pop();
				for (const line of lines) {
					if (!line.startsWith('data: {')) {
						continue;
					}
					const delta = JSON.parse(line.slice(6)).choices?.[0]?.delta?.content;
					if (delta) {
						p.textContent += delta;
					}
				}
			}
			status.textContent = 'Streamed a paragraph.';
		} catch (err) {
			status.textContent = 'Not streamed: ' + err.message;
		} finally {
			streamButton.disabled = false;
		}
	}
	streamButton.addEventListener('click', stream);
}
