// hello: the smallest function. Default route: POST /hello
//
//   curl -s localhost:8000/hello -H 'content-type: application/json' -d '{"name": "Ada"}'
//
// `new Date()` is recorded on the request's trace (its replay tape), so a replay can give it the same time.
export default async function (req, ctx) {
  return {
    status: 200,
    body: { hello: req.body?.name ?? "world", now: new Date().toISOString() },
  };
}
