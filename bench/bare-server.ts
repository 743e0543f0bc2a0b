// Baseline for bench/intake: a bare Express route that parses the same JSON and answers 202.
import express from 'express';

const app = express();
app.post('/referrals', express.json({ limit: '25mb' }), (req, res) => {
  res.status(202).json({ id: 'bare', externalId: (req.body as { externalId?: string }).externalId });
});
const server = app.listen(Number(process.env.PORT ?? 0), '127.0.0.1', () => {
  const addr = server.address();
  process.stdout.write(`${JSON.stringify({ event: 'listening', port: typeof addr === 'object' && addr ? addr.port : 0 })}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
